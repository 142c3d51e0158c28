#!/usr/bin/env bash
# The GitHub Action's step (action.yml): fuse and verify the given models, write the
# reports into REPORT_DIR (JSON, JUnit, HTML; Markdown appended to the job summary by
# bnfuse itself), and exit as bnfuse exits (0 pass, 1 verification failed, 2 error).
#   MODELS      models, folders or globs (space-separated), as bnfuse takes them
#   OUTPUT_DIR  where the fused models go
#   REPORT_DIR  where the reports go
#   ARGS        more bnfuse options (e.g. --samples 4)
set -u
: "${MODELS:?set MODELS to the models to fuse}"
OUTPUT_DIR=${OUTPUT_DIR:-bnfuse-out}
REPORT_DIR=${REPORT_DIR:-bnfuse-reports}
mkdir -p "$OUTPUT_DIR" "$REPORT_DIR"
# shellcheck disable=SC2086  # MODELS and ARGS are lists of words, and globs for bnfuse
set -f  # globs go to bnfuse, which expands them itself (recursive ** included)
set -- $MODELS
if [ "$#" -eq 1 ] && [ -f "$1" ]; then
    out="$OUTPUT_DIR/$(basename "$1")"  # one model: written to a file of its name
else
    out="$OUTPUT_DIR/"  # a batch: into the folder
fi
bnfuse "$@" -o "$out" ${ARGS:-} \
    --report "$REPORT_DIR/bnfuse.json" --report "$REPORT_DIR/bnfuse.xml" \
    --report "$REPORT_DIR/bnfuse.html" --report "$REPORT_DIR/bnfuse.md"
code=$?
set +f
echo "exit-code=$code" >> "${GITHUB_OUTPUT:-/dev/null}"
exit "$code"
