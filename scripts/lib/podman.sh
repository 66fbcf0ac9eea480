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
    mkdir -p "$dir/storage" "$dir/run"

    # runc and cgroupfs because crun rejects hybrid cgroups; fixed ulimits because the
    # runtime fails on rlimits the kernel refuses.
    cat >"$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
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
# pid in DIR/podman.pid and wait until the socket answers /_ping (30 s at most).
podman_service_start() {
    local dir="$1"
    local socket="$dir/podman.sock"
    rm -f "$socket"

    podman_private "$dir" system service --time=0 "unix://$socket" >"$dir/podman-service.log" 2>&1 &
    echo $! >"$dir/podman.pid"

    local attempt
    for attempt in $(seq 1 300); do
        if curl --silent --fail --unix-socket "$socket" http://podman/_ping >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$(cat "$dir/podman.pid")" 2>/dev/null; then
            echo "podman system service exited before answering; log: $dir/podman-service.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "podman system service did not answer on $socket within 30 s; log: $dir/podman-service.log" >&2
    return 1
}

# Stop the service started by podman_service_start for DIR; does nothing if none runs.
podman_service_stop() {
    local dir="$1"
    local pid_file="$dir/podman.pid"
    if [[ ! -f "$pid_file" ]]; then
        return 0
    fi

    local pid
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        local attempt
        for attempt in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        # The service ignored SIGTERM for 10 s: end it so the caller can remove DIR.
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pid_file" "$dir/podman.sock"
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
    tar -C "$root" -c . | podman_private "$dir" import - "$image" >/dev/null
    rm -rf "$root"
}

# Tell whether PATH is a statically linked executable (ldd prints "not a dynamic executable").
file_is_static() {
    local path="$1"
    [[ -x "$path" ]] || return 1
    ! ldd "$path" >/dev/null 2>&1
}
