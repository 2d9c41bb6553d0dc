#!/usr/bin/env bash
# Go's compiler, for the test that renders an export's Ollama TEMPLATE with Go's text/template (Ollama's own
# template engine): Debian's package, installed when missing. Needs root (or sudo) and the Debian mirrors.
set -euo pipefail
if command -v go >/dev/null 2>&1; then command -v go; exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing Debian's golang-go for the Modelfile test (about ten seconds)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq --no-install-recommends golang-go >&2
command -v go
