"""Running a module on its real kernel, booted in a VM: the initramfs
made from a client's own ``staprun`` (``initramfs``, with ``elf`` and
``cpio``), qemu driven from the reactor (``runner``), and what the serial
console said (``console``)."""
