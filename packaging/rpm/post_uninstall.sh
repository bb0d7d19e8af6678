# amq2api %postun ($1: 0 = erase, 1 = upgrade). Erase keeps the accounts file, the state in
# /var/lib/amq2api and the amq2api user; /etc/amq2api goes only if nothing is left in it.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
if [ "$1" -eq 0 ] && [ -d /etc/amq2api ]; then
    rmdir --ignore-fail-on-non-empty /etc/amq2api || :
fi
