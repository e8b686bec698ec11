"""Answers to repeated requests: the key, the disk store and the fleet
(Redis) store."""
