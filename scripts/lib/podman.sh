# shellcheck shell=bash
# Podman helpers sourced by scripts/quickstart and scripts/test.
#
# Every function works inside one private folder DIR: its own containers.conf,
# registries.conf, image storage, run root and API socket. None of them touches the
# host's global Podman storage or /var/run/docker.sock. The functions are safe under
# `set -euo pipefail`.

# Write DIR/containers.conf and DIR/registries.conf and export the variables that make
# every later podman call in this shell read them. Each REGISTRY_HOST (host:port) is
# marked insecure, so podman talks plain HTTP to it.
podman_env_setup() {
    local dir="$1"
    shift
    mkdir -p "$dir/storage" "$dir/run" "$dir/tmp" "$dir/networks"

    # runc and cgroupfs because crun rejects hybrid cgroups; fixed ulimits because the
    # runtime fails on rlimits the kernel refuses. tmp_dir keeps exit files and the event
    # log out of the shared /run/libpod. netns "none" gives containers no network, so no
    # bridge or firewall rule is added to the host.
    cat >"$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
tmp_dir = "$dir/tmp"

[network]
network_config_dir = "$dir/networks"
CONF

    # No unqualified search registries, so a short name can never reach an outside registry.
    printf 'unqualified-search-registries = []\n' >"$dir/registries.conf"
    local host
    for host in "$@"; do
        printf '\n[[registry]]\nlocation = "%s"\ninsecure = true\n' "$host" >>"$dir/registries.conf"
    done

    export CONTAINERS_CONF="$dir/containers.conf"
    export CONTAINERS_REGISTRIES_CONF="$dir/registries.conf"
}

# Run the podman CLI on the private storage of DIR.
podman_private() {
    local dir="$1"
    shift
    podman --root "$dir/storage" --runroot "$dir/run" "$@"
}

# Start `podman system service` on unix://DIR/podman.sock in the background, record its
# pid in DIR/podman.pid and wait until the socket responds to /_ping (30 s at most).
podman_service_start() {
    local dir="$1"
    local socket="$dir/podman.sock"
    rm -f "$socket"

    # podman runs as the background job itself (not inside a function), so $! is its pid.
    podman --root "$dir/storage" --runroot "$dir/run" system service --time=0 "unix://$socket" \
        >"$dir/podman-service.log" 2>&1 </dev/null &
    echo $! >"$dir/podman.pid"

    local attempt
    for attempt in $(seq 1 300); do
        if curl --silent --fail --unix-socket "$socket" http://podman/_ping >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$(cat "$dir/podman.pid")" 2>/dev/null; then
            echo "podman system service exited before it responded; log: $dir/podman-service.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "podman system service did not respond on $socket within 30 s; log: $dir/podman-service.log" >&2
    podman_service_stop "$dir"
    return 1
}

# Stop the service started by podman_service_start for DIR, end the conmon processes
# left in DIR and unmount DIR's storage, so DIR can be deleted. Does nothing if nothing runs.
podman_service_stop() {
    local dir="$1"
    local pid_file="$dir/podman.pid"
    if [[ -f "$pid_file" ]]; then
        stop_pid "$(cat "$pid_file")"
        rm -f "$pid_file" "$dir/podman.sock"
    fi

    # Podman 4.3 leaves the conmon of an API exec session running after its container is
    # removed. Each conmon names DIR's storage in its command line, so this ends only them.
    local conmon_pid
    for conmon_pid in $(pgrep -f -- "^/usr/bin/conmon .*$dir/storage/" || true); do
        stop_pid "$conmon_pid"
    done

    # The overlay driver bind-mounts its own folder, and the mount outlives the service.
    if mountpoint -q "$dir/storage/overlay" 2>/dev/null; then
        umount "$dir/storage/overlay" || echo "could not unmount $dir/storage/overlay; unmount it by hand" >&2
    fi
}

# Send SIGTERM to PID, and SIGKILL if it still runs 10 s later.
stop_pid() {
    local pid="$1"
    pid_running "$pid" || return 0
    kill "$pid" 2>/dev/null || return 0

    local attempt
    for attempt in $(seq 1 100); do
        pid_running "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# Tell whether PID runs; a zombie waiting for its parent to reap it does not count.
pid_running() {
    local pid="$1"
    [[ -r "/proc/$pid/status" ]] || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# Import a one-binary image IMAGE (such as localhost/sandbox-mini:1) into DIR's storage:
# /bin/busybox from busybox-static, run commands as `/bin/busybox sh -c '...'`.
podman_build_mini_image() {
    local dir="$1"
    local image="$2"
    local busybox="${BUSYBOX_STATIC:-/bin/busybox}"
    if ! file_is_static "$busybox"; then
        echo "$busybox is not a static binary; install busybox-static (apt-get install -y busybox-static)" >&2
        return 1
    fi

    local root="$dir/mini-rootfs"
    rm -rf "$root"
    mkdir -p "$root/bin" "$root/tmp"
    cp "$busybox" "$root/bin/busybox"
    tar -C "$root" -c . | podman_private "$dir" import --quiet - "$image" >/dev/null
    rm -rf "$root"
}

# Tell whether PATH is a statically linked executable (ldd prints "not a dynamic executable").
file_is_static() {
    local path="$1"
    [[ -x "$path" ]] || return 1
    ! ldd "$path" >/dev/null 2>&1
}
