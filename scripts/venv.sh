# Sourced by demo.sh and test.sh: the project-local virtual environment .venv/.
# Creates it once (with $PYTHON, default python3) and (re)installs tfcert with the extras
# "$1" only when pyproject.toml changed, so reruns reuse it.  The system interpreter's
# packages are never touched.
venv_python() {
  local extras="$1" venv=.venv
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  local stamp="$venv/.installed-${extras:-default}"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -e ".${extras:+[$extras]}" >&2
    echo "$want" > "$stamp"
  fi
  echo "$PWD/$venv/bin/python"
}
