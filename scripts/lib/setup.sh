# Set-up steps shared by scripts/test and scripts/quickstart. Source it; each function is idempotent.
# Runs on Debian as root; installs only what is missing.

SYSTEM_PACKAGES=(podman runc docker-registry busybox-static apache2-utils curl)

step() { printf '\n==> %s\n' "$*"; }

missing_packages() {
  local package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || printf '%s\n' "$package"
  done
}

ensure_system_packages() {
  local missing
  missing=$(missing_packages "${SYSTEM_PACKAGES[@]}" "$@")
  if [ -z "$missing" ]; then
    return 0
  fi
  step "installing system packages: $(echo $missing)"
  apt-get update -q
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
}

ensure_venv() {
  local root=$1
  local python=${PYTHON:-python3}
  if [ ! -x "$root/.venv/bin/python" ]; then
    step "creating the Python virtual environment in $root/.venv"
    "$python" -m venv "$root/.venv"
  fi
  # A stamp skips the install when pyproject.toml has not changed since the last one.
  local stamp="$root/.venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
  if [ ! -e "$stamp" ]; then
    step "installing sandbox-backup and its dependencies into .venv"
    "$root/.venv/bin/pip" install -q --upgrade pip
    "$root/.venv/bin/pip" install -q -e "$root[test]"
    rm -f "$root"/.venv/.installed-*
    touch "$stamp"
  fi
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ensure_postgres() {
  if port_open 5432; then
    return 0
  fi
  step "starting PostgreSQL on 127.0.0.1:5432"
  if [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    ensure_system_packages postgresql
    local version hba
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    # A fresh install asks for passwords over TCP; the tests connect as postgres from loopback only.
    if ! grep -q "sandbox-backup tests" "$hba"; then
      sed -i '1i host all postgres 127.0.0.1/32 trust # sandbox-backup tests' "$hba"
    fi
  fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  for _ in $(seq 1 30); do port_open 5432 && return 0; sleep 1; done
  echo "PostgreSQL did not start on 127.0.0.1:5432" >&2
  return 1
}

ensure_redis() {
  if port_open 6379; then
    return 0
  fi
  step "starting Redis on 127.0.0.1:6379"
  command -v redis-server >/dev/null || ensure_system_packages redis-server
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 30); do port_open 6379 && return 0; sleep 1; done
  echo "Redis did not start on 127.0.0.1:6379" >&2
  return 1
}
