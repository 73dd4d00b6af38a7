#!/usr/bin/env bash
# Installs first-party plugins into a celer plugins directory, the way the
# docs recommend: manifest first, then the component under a dot-name,
# renamed into place (the host never sees a half-written file).
#
#   examples/install_plugins.sh DIR [PLUGIN…]     (default: the six seed plugins)
#
# Needs `make plugins` (target/wasm32-wasip2/release/<name>.wasm).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:?usage: $0 PLUGINS_DIR [PLUGIN…]}"; shift
plugins=("$@"); [ ${#plugins[@]} -eq 0 ] && plugins=(email export cleanup events audit permissions)
wasm_dir="${CARGO_TARGET_DIR:-$root/target}/wasm32-wasip2/release"
mkdir -p "$dir"
for p in "${plugins[@]}"; do
  manifest="$root/plugins/$p/celer-plugin.toml"
  [ -f "$manifest" ] || manifest="$root/tests/plugins/$p/celer-plugin.toml"
  [ -f "$manifest" ] || { echo "install_plugins: no manifest for $p" >&2; exit 2; }
  [ -f "$wasm_dir/$p.wasm" ] || { echo "install_plugins: $wasm_dir/$p.wasm is missing: run make plugins" >&2; exit 2; }
  cp "$manifest" "$dir/.$p.toml.tmp" && mv "$dir/.$p.toml.tmp" "$dir/$p.toml"
  cp "$wasm_dir/$p.wasm" "$dir/.$p.wasm.tmp" && mv "$dir/.$p.wasm.tmp" "$dir/$p.wasm"
done
echo "installed into $dir: ${plugins[*]}" >&2
