#!/usr/bin/env bash
# Container entrypoint of the interpgw images (deploy/docker/Dockerfile.cpu, Dockerfile.gpu).
#
#   (no arguments)          interpgw serve on all interfaces: gRPC 50051, Prometheus /metrics 9464
#   --flag ...              the same, with these `interpgw serve` flags added; a flag given here wins over the
#                           defaults below (argparse keeps the last value), e.g. --port 6000 or --host 127.0.0.1
#   serve --flag ...        the same ("serve" is optional)
#   COMMAND ...             runs COMMAND instead, e.g. `interpgw keys create ...` or `bash`
#
# Environment: INTERPGW_REDIS_URL (optional) adds --redis-url "$INTERPGW_REDIS_URL", so a URL with a password can
# come from a Secret instead of the command line. Everything else is a flag; `interpgw serve --help` lists them.
# exec: the gateway replaces this shell, so SIGTERM reaches it directly (it drains, then exits 0; exit 3 means
# the model engine died and the container should be restarted).
set -euo pipefail

if [ "${1:-}" = "serve" ]; then
  shift
elif [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi

defaults=(--host 0.0.0.0 --port 50051 --metrics-host 0.0.0.0 --metrics-port 9464)
if [ -n "${INTERPGW_REDIS_URL:-}" ]; then
  defaults+=(--redis-url "$INTERPGW_REDIS_URL")
fi
exec interpgw serve "${defaults[@]}" "$@"
