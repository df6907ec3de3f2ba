#!/usr/bin/env bash
# Dependency audit and SBOM of what `pip install .` ships.
#
#   scripts/supply-chain.sh                 # audit + SBOM of a fresh runtime venv (pip install ., no extras)
#   scripts/supply-chain.sh --env .venv/bin/python   # of an existing environment instead (e.g. the test one)
#
# Outputs (build/ is git-ignored): build/sbom.cdx.json (CycloneDX 1.6 JSON) and build/pip-audit.json.
# The tools (pip-audit, cyclonedx-bom) live in their own venv, build/supply-chain-tools, never in the
# audited environment. Exit status: 0 clean (or the advisory service unreachable: said loudly, not a
# failure, so an offline CI still passes), 1 vulnerabilities found (SUPPLY_CHAIN_ALLOW_VULNS=1: report
# only), 2 the SBOM could not be built.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build
tools=$out/supply-chain-tools
target_python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --env) target_python=$2; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "supply-chain: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"

if [ ! -x "$tools/bin/cyclonedx-py" ] || [ ! -x "$tools/bin/pip-audit" ]; then
  python3 -m venv "$tools"
  if ! "$tools/bin/pip" install -q 'pip-audit>=2.7,<3' 'cyclonedx-bom>=4,<8'; then
    echo "supply-chain: SKIPPED: cannot install pip-audit/cyclonedx-bom (package index unreachable?)" >&2
    exit 0
  fi
fi

if [ -z "$target_python" ]; then
  runtime=$out/supply-chain-runtime
  rm -rf "$runtime"
  python3 -m venv "$runtime"
  "$runtime/bin/pip" install -q . >/dev/null
  target_python=$runtime/bin/python
fi
echo "supply-chain: environment $("$target_python" -c 'import sys; print(sys.prefix)')"

# SBOM: every distribution installed in the environment, fhirvault's pyproject as the root component.
if ! "$tools/bin/cyclonedx-py" environment "$target_python" --pyproject pyproject.toml --of JSON \
      --output-reproducible -o "$out/sbom.cdx.json"; then
  echo "supply-chain: FAILED to build the SBOM" >&2
  exit 2
fi
echo "supply-chain: SBOM $out/sbom.cdx.json ($("$tools/bin/python" -c \
  "import json,sys; print(len(json.load(open(sys.argv[1])).get('components', [])))" "$out/sbom.cdx.json") components)"

# pip-audit asks the PyPI JSON API for advisories: check it is reachable first, so that "offline" is not
# mistaken for "no vulnerabilities" nor fails the build (a partial answer is handled below).
if ! "$tools/bin/python" - <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=15).close()
except Exception as exc:
    print(f"supply-chain: pip-audit SKIPPED: the PyPI vulnerability service is unreachable ({exc})",
          file=sys.stderr)
    sys.exit(1)
EOF
then
  exit 0
fi

# PIPAPI_PYTHON_LOCATION: audit the target environment, not the tools' own venv.
PIPAPI_PYTHON_LOCATION="$target_python" "$tools/bin/pip-audit" --progress-spinner off --desc on -f json \
  -o "$out/pip-audit.json" 2>/dev/null || true
# Read the report rather than the exit status: a package the service does not know ("not found on PyPI")
# is skipped, and a report where everything was skipped is no audit at all, not a clean one.
"$tools/bin/python" - "$out/pip-audit.json" <<'EOF'
import json, os, sys
try:
    deps = json.load(open(sys.argv[1]))["dependencies"]
except (OSError, ValueError, KeyError) as exc:
    print(f"supply-chain: pip-audit SKIPPED: no report ({exc}); is the advisory service reachable?", file=sys.stderr)
    sys.exit(0)
deps = [d for d in deps if d["name"] != "fhirvault"]  # the project itself: a local build
skipped = [d for d in deps if d.get("skip_reason")]
audited = [d for d in deps if not d.get("skip_reason")]
vulnerable = [d for d in audited if d.get("vulns")]
for d in vulnerable:
    for v in d["vulns"]:
        fix = ", ".join(v.get("fix_versions") or []) or "none yet"
        print(f"  {d['name']} {d['version']}: {v['id']} (fixed in: {fix})")
print(f"supply-chain: pip-audit: {len(audited)} packages audited, {len(vulnerable)} vulnerable, "
      f"{len(skipped)} not audited")
if skipped:
    print("  not audited: " + ", ".join(d["name"] for d in skipped), file=sys.stderr)
    print(f"  reason: {skipped[0]['skip_reason']}", file=sys.stderr)
if not audited:
    print("supply-chain: pip-audit SKIPPED: the vulnerability service answered for none of the packages "
          "(unreachable, or a mirror without advisories): this is NOT a clean audit", file=sys.stderr)
    sys.exit(0)
if vulnerable and os.environ.get("SUPPLY_CHAIN_ALLOW_VULNS") != "1":
    sys.exit(1)
EOF
