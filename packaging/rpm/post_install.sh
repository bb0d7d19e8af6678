# amq2api %post ($1: 1 = install, 2 = upgrade). Same as the Debian postinst: the amq2api user
# and group, /etc/amq2api root:amq2api 0750, the example accounts file on first install
# (root:amq2api 0640). It never enables or starts the service.
systemd-sysusers /usr/lib/sysusers.d/amq2api.conf || :
if [ ! -e /etc/amq2api/accounts.toml ] && [ ! -L /etc/amq2api/accounts.toml ]; then
    install -m 0640 -o root -g amq2api /usr/share/doc/amq2api/examples/accounts.toml \
        /etc/amq2api/accounts.toml || :
fi
systemd-tmpfiles --create /usr/lib/tmpfiles.d/amq2api.conf || :
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 2 ]; then
        systemctl try-restart amq2api.service || :
    fi
fi
