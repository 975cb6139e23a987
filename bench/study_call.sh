# Sourced by bench/h200_session12.sh and h200_session13.sh, after bench/gpu_env.sh, at the repository root of a
# device call: the corpus unpacked (data/site_corpus.tar.xz, carried) and `study ARMS MINUTES [MORE...]`, one
# scripts/run_study.py call over $WORK_DIR (default runs/study) with the study's GPU plan; MORE: further flags or overrides.
if [ ! -f data/site_corpus.tar.xz ]; then
  echo "error: data/site_corpus.tar.xz is not in this tree: build the corpus here (docs/quality.md, \"The corpus\"), pack" \
    "it with 'tar -cJf data/site_corpus.tar.xz -C data site_corpus' and carry it" >&2
  exit 2
fi
tar -xJf data/site_corpus.tar.xz -C data || exit 1
TOKENS=${TOKENS:-34078720}        # 1,040 steps of 4 x 8,192 tokens per arm, as session 11's pilot
SHORT_TOKENS=${SHORT_TOKENS:-26214400}  # the shared start: 800 steps of 64 x 512 tokens
# Prompts per passkey cell: 40 from session 15 on (20 before). At 20, the 100 prompts at 8K carry about 4.5
# points of binomial noise per arm, as much as the 5-point floor; 40 costs about 3 s more per evaluation.
PASSKEY_SAMPLES=${PASSKEY_SAMPLES:-40}
WORK_DIR=${WORK_DIR:-runs/study}  # a warm machine keeps it: a later call with the same overrides resumes it
study() {
  mkdir -p "$WORK_DIR" && ln -sfn "$PWD/data/site_corpus" "$WORK_DIR/corpus"
  python3 scripts/run_study.py --work-dir "$WORK_DIR" --results-dir "$OUT/quality" --budget-minutes "$2" \
    --workers 14 --tokens-per-arm "$TOKENS" --short-tokens "$SHORT_TOKENS" --recall-fraction 0.5 \
    --copy-documents 64 --passkey-samples "$PASSKEY_SAMPLES" --arms "$1" "${@:3}" > "$OUT/quality-console.log" 2>&1
  grep -v -i warn "$OUT/quality-console.log" | grep "\[study\]\|Error\|error" | tail -30
}
