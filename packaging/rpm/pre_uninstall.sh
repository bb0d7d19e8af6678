# amq2api %preun ($1: 0 = erase, 1 = upgrade). On erase: stop and disable the units.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now amq2api.socket amq2api.service >/dev/null 2>&1 || :
fi
