"""Who the server is and who trusts it: its key and certificate (and the
TLS options built from them), the import of a stap-serverd NSS database,
the clients' trust databases and the machine owner keys."""
