#!/usr/bin/env bash
# On the lent GPU machine, from the repository root. Each call carries one part of .gpu/ (pack.sh) and runs
#   bash reference/device/run.sh stage        keep this call's part in $STAGE, print the machine (calls 1, 2)
#   bash reference/device/run.sh run SECONDS  keep the last part, install, labkit run --full (call 3)
# A short run can carry .gpu/a alone and call `run` at once: what needs smollm2-135m is then skipped.
# The machine keeps $STAGE while warm (30 s after a call): make the three calls back to back.
# What the run wrote comes back as $OUT/run.tgz, refreshed every 20 s, so a stop at the limit still returns it.
set -u
STAGE=/root/labkit-stage
SITE=/tmp/labkit-site
mkdir -p "$STAGE"
for part in .gpu/*/*; do [ -f "$part" ] && cp "$part" "$STAGE/"; done
echo "staged: $(cd "$STAGE" && ls | tr '\n' ' ')"
if [ "${1:-}" = stage ]; then
  nvidia-smi -L; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
  exit 0
fi
limit=${2:-480}
for f in site.tar.xz minilm.tar; do
  [ -f "$STAGE/$f" ] || { echo "missing $f: the machine went cold between calls; stage again"; exit 3; }
done
mkdir -p "$SITE" && tar -xJf "$STAGE/site.tar.xz" -C "$SITE" && tar -xf "$STAGE/minilm.tar" -C "$SITE"
if [ -f "$STAGE/smollm2.part00" ] && [ -f "$STAGE/smollm2.part01" ]; then
  cat "$STAGE"/smollm2.part0? > /tmp/smollm2.tar
  [ "$(sha256sum /tmp/smollm2.tar | cut -d' ' -f1)" = "$(cat "$STAGE/smollm2.sha256")" ] || { echo "smollm2 parts do not match"; exit 3; }
  tar -xf /tmp/smollm2.tar -C "$SITE"
else  # a short run with the first part only: the notebooks skip what needs smollm2-135m, each with its reason
  echo "smollm2-135m not staged: the sections that use it will be skipped"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LABKIT_CACHE=/root/labkit-cache
export PATH="$SITE/bin:$PATH"
python3 -c "import bitsandbytes, papermill, ipykernel, torch; print('bitsandbytes', bitsandbytes.__version__, 'papermill', papermill.__version__, 'ipykernel', ipykernel.__version__)"
RUN=/root/run
mkdir -p "$RUN"
{ nvidia-smi; nvidia-smi topo -m; python3 -m pip list 2>/dev/null; } > "$RUN/machine.txt" 2>&1
( while sleep 20; do tar -czf "$OUT/run.tgz.part" -C /root run 2>/dev/null && mv "$OUT/run.tgz.part" "$OUT/run.tgz"; done ) &
saver=$!
start=$(date +%s)
python3 -m labkit.cli prepare 2>&1 | tail -3
echo "prepare took $(( $(date +%s) - start )) s"
left=$(( limit - ($(date +%s) - start) ))
# SIGINT first: labkit stops the notebook's kernel and its jobs; the summary keeps what finished.
timeout -s INT -k 15 "$left" python3 -m labkit.cli run --full --no-progress --timeout "${NOTEBOOK_TIMEOUT:-150}" \
  --out "$RUN" ${NOTEBOOKS:+--notebooks "$NOTEBOOKS"} 2>&1 | tee "$RUN/labkit-run.log"
kill "$saver" 2>/dev/null
tar -czf "$OUT/run.tgz" -C /root run
ls -la "$RUN"
