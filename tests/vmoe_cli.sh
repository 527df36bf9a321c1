#!/usr/bin/env bash
# vmoe checkpoints through the command line (registered in ctest), against the
# fixtures written by Google's vmoe code (../shared/fixtures/vmoe, beside the
# checkout; the test fails when they are missing):
#  1. `predict` reproduces vmoe's logits (E3: and ensemble log-probabilities) on 1, 2
#     and 4 ranks, experts split across ranks unlike in the files; uint8 input scaled
#     as vmoe does;
#  2. `ckpt export-vmoe` of a fixture is byte-identical to the files vmoe wrote; the
#     import of the export equals the import of the fixture;
#  3. fine-tuning starts from a fixture through finetune.init on 2 ranks (position
#     embeddings zoomed, new head), the router reference is the imported router;
#  4. bad input: missing shard, truncated shard, bytes of an array overwritten, an
#     unknown extension type, a config that disagrees, a directory instead of a
#     prefix: exit code 2 on every rank, one line naming the file or leaf, nothing written.
# usage: vmoe_cli.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" vmoe "$1" "$2"
CMP="$(dirname "$BIN")/tests/st_compare"
FX="$SRC/../shared/fixtures/vmoe"
[ -f "$FX/vmoe-tiny-every2/ckpt.index" ] || fail "fixtures missing: $FX (shared/ must be beside the checkout)"
# Routing settings of the fixtures (their config.json): capacity factor 1.5, groups of
# 2 images (vmoe's group_size 34 tokens = 2 x 17; E3: 68 = 2 x 17 x 2 members).
# vmoe's checkpoint files do not record k: it comes from the job config (top-2 here,
# the embedded default's top-1 otherwise; E3's loop below sets 1).
ROUTE=(--set model.moe.capacity_factor=1.5 --set model.moe.group_size=2 --set model.moe.top_k=2)
TOL=1e-5   # float32 throughout; the smallest semantic mistake (erf-GELU) shows as 2.3e-4

# 1. vmoe's logits on 1, 2 and 4 ranks.
for np in 1 2 4; do
  for fx in vmoe-tiny-every2 vmoe-tiny-prelogits-bf16 e3-tiny; do
    k=2; [ "$fx" = e3-tiny ] && k=1
    out="$W/$fx.np$np.npy"
    "${MPI[@]}" -np $np "$BIN" predict --init "$FX/$fx/ckpt" --images "$FX/$fx/inputs.npy" --out "$out" \
      "${ROUTE[@]}" --set model.moe.top_k=$k > "$W/p.log" 2>&1 || { cat "$W/p.log"; fail "predict $fx np=$np"; }
    "$CMP" "$out" "$FX/$fx/logits.npy" $TOL > "$W/c.log" || { cat "$W/c.log"; fail "$fx np=$np: logits differ"; }
    echo "ok: $fx on $np rank(s): $(cat "$W/c.log")"
    if [ "$fx" = e3-tiny ]; then
      "$CMP" "$W/$fx.np$np.ensemble.npy" "$FX/$fx/ensemble_log_probs.npy" $TOL > "$W/c.log" \
        || { cat "$W/c.log"; fail "$fx np=$np: ensemble log-probabilities differ"; }
      echo "ok: $fx ensemble on $np rank(s): $(cat "$W/c.log")"
    fi
  done
done
"${MPI[@]}" -np 2 "$BIN" predict --init "$FX/vmoe-tiny-prelogits-bf16/ckpt" --images "$FX/vmoe-tiny-prelogits-bf16/inputs_uint8.npy" \
  --out "$W/u8.npy" "${ROUTE[@]}" > "$W/p.log" 2>&1 || { cat "$W/p.log"; fail "predict uint8"; }
grep -q "uint8 -> -1 + x/255\*2" "$W/p.log" || { cat "$W/p.log"; fail "predict uint8: conversion not reported"; }
"$CMP" "$W/u8.npy" "$FX/vmoe-tiny-prelogits-bf16/logits.npy" $TOL > "$W/c.log" || { cat "$W/c.log"; fail "uint8 input"; }
echo "ok: uint8 NHWC input: $(cat "$W/c.log")"

# 2. Export: byte-identical to vmoe's own files; import of the export = import of the fixture.
for fx in vmoe-tiny-every2 e3-tiny; do
  mkdir -p "$W/rt_$fx"
  "${MPI[@]}" -np 2 "$BIN" ckpt export-vmoe "$FX/$fx/ckpt" "$W/rt_$fx/ckpt" --shards 2 > "$W/x.log" 2>&1 \
    || { cat "$W/x.log"; fail "export-vmoe $fx"; }
  for f in ckpt.index ckpt.data-00000-of-00002 ckpt.data-00001-of-00002; do
    cmp -s "$W/rt_$fx/$f" "$FX/$fx/$f" || fail "export-vmoe $fx: $f differs from the file vmoe wrote"
  done
  echo "ok: export-vmoe $fx on 2 ranks: index and both data files byte-identical to vmoe's"
done
"$BIN" ckpt import "$FX/vmoe-tiny-prelogits-bf16/ckpt" "$W/a.safetensors" > "$W/i.log" 2>&1 || { cat "$W/i.log"; fail "import"; }
grep -q "bfloat16" "$W/i.log" && grep -q "representation_size 24" "$W/i.log" || { cat "$W/i.log"; fail "import: report"; }
mkdir -p "$W/rt"
"${MPI[@]}" -np 4 "$BIN" ckpt export-vmoe "$FX/vmoe-tiny-prelogits-bf16/ckpt" "$W/rt/ckpt" --shards 3 > "$W/x.log" 2>&1 \
  || { cat "$W/x.log"; fail "export-vmoe on 4 ranks"; }
"${MPI[@]}" -np 2 "$BIN" ckpt import "$W/rt/ckpt" "$W/b.safetensors" > "$W/i.log" 2>&1 || { cat "$W/i.log"; fail "import of export"; }
"$CMP" "$W/b.safetensors" "$W/a.safetensors" 0 > "$W/c.log" || { cat "$W/c.log"; fail "round trip changed a tensor"; }
echo "ok: fixture -> export (4 ranks, 3 files) -> import (2 ranks): no tensor changed"

# 3. Fine-tuning from a fixture: 3 channels, 24 px (3x3 patches: position embeddings zoomed from 4x4).
cat > "$W/ft.yaml" <<YAML
base: $CFG
model: {name: vmoe-fixture, image_size: 24, channels: 3, patch_size: 8, hidden: 32, mlp_dim: 64, num_layers: 4,
        num_heads: 2, representation_size: 24, head_bias_init: -1.0,
        moe: {num_experts: 4, top_k: 2, every: 2, capacity_factor: 1.5, group_size: 2}}
data: {augment: {mean: [0.5], std: [0.5]}}
pretrain: {enabled: false}
finetune: {init: $FX/vmoe-tiny-prelogits-bf16/ckpt, steps: 4, history_every: 2}
YAML
"${MPI[@]}" -np 2 "$BIN" finetune --config "$W/ft.yaml" --set output.dir="$W/ft" > "$W/f.log" 2>&1 || { cat "$W/f.log"; fail "finetune from a fixture"; }
grep -q "loaded vmoe checkpoint .*position embeddings zoomed" "$W/f.log" || { cat "$W/f.log"; fail "finetune: no vmoe load message"; }
"$BIN" ckpt export "$W/ft/checkpoints" "$W/ft.safetensors" > /dev/null 2>&1 || fail "export of the fine-tuned checkpoint"
for b in 1 3; do
  "$CMP" "$W/ft.safetensors::history.reference.$b" "$W/a.safetensors::blocks.$b.moe.routers.0.weight" 0 > "$W/c.log" \
    || { cat "$W/c.log"; fail "router reference of block $b is not the imported router"; }
done
echo "ok: fine-tuned 4 steps on 2 ranks from the fixture; router references = imported routers"
# predict from the fine-tuned checkpoint root (architecture, routing and pixel scaling as
# saved): 1 and 4 ranks agree; 10 images leave padding on 4 ranks.
make_npy() {  # FILE N H W C: uint8 NHWC, pseudo-random bytes from a fixed seed
  local hdr="{'descr': '|u1', 'fortran_order': False, 'shape': ($2, $3, $4, $5), }"
  while [ $(( (10 + ${#hdr} + 1) % 64 )) -ne 0 ]; do hdr="$hdr "; done
  { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $(( (${#hdr} + 1) % 256 )))\\x$(printf %02x $(( (${#hdr} + 1) / 256 )))";
    printf '%s\n' "$hdr"; LC_ALL=C awk -v n=$(( $2 * $3 * $4 * $5 )) 'BEGIN { srand(5); for (i = 0; i < n; i++) printf "%c", int(rand() * 256) }'; } > "$1"
}
make_npy "$W/img24.npy" 10 24 24 3
for np in 1 4; do
  "${MPI[@]}" -np $np "$BIN" predict --init "$W/ft/checkpoints" --images "$W/img24.npy" --out "$W/ck$np.npy" > "$W/p.log" 2>&1 \
    || { cat "$W/p.log"; fail "predict from the fine-tuned checkpoint on $np ranks"; }
done
grep -q "the checkpoint's data.augment.mean 0.5, std 0.5" "$W/p.log" || { cat "$W/p.log"; fail "predict: pixel scaling not the checkpoint's"; }
"$CMP" "$W/ck4.npy" "$W/ck1.npy" $TOL > "$W/c.log" || { cat "$W/c.log"; fail "predict from a checkpoint: 4 ranks != 1 rank"; }
echo "ok: predict from the fine-tuned checkpoint: 4 ranks = 1 rank ($(cat "$W/c.log"))"

# 4. Bad input.
expect_error() {  # message command...
  msg="$1"; shift
  rm -f "$W/never.npy" "$W/never.safetensors"
  "${MPI[@]}" -np 2 "$BIN" "$@" > "$W/e.log" 2>&1
  rc=$?
  [ "$rc" -eq 2 ] || { cat "$W/e.log"; fail "$*: exit code $rc, expected 2"; }
  for r in 0 1; do
    grep -q "rank $r/2\] error: .*$msg" "$W/e.log" || { cat "$W/e.log"; fail "$*: rank $r did not say '$msg'"; }
  done
  [ ! -e "$W/never.npy" ] && [ ! -e "$W/never.safetensors" ] || fail "$*: wrote output"
  echo "ok: exit 2 on both ranks: $(grep -m1 'rank 0/2\] error' "$W/e.log" | sed 's/.*error: //')"
}
bad() {  # name: a copy of vmoe-tiny-every2 to break
  rm -rf "$W/bad"; mkdir -p "$W/bad"; cp "$FX/vmoe-tiny-every2"/ckpt.* "$W/bad/"; chmod u+w "$W/bad"/*
}
PRED=(predict --images "$FX/vmoe-tiny-every2/inputs.npy" --out "$W/never.npy" "${ROUTE[@]}")
bad; rm "$W/bad/ckpt.data-00001-of-00002"
expect_error "'$W/bad/ckpt.data-00001-of-00002' is missing" "${PRED[@]}" --init "$W/bad/ckpt"
bad; truncate -s 200000 "$W/bad/ckpt.data-00000-of-00002"
expect_error "vmoe data file '$W/bad/ckpt.data-00000-of-00002' is truncated" "${PRED[@]}" --init "$W/bad/ckpt"
bad; printf '\xff\xff\xff\xff\xff\xff\xff\xff' | dd of="$W/bad/ckpt.data-00001-of-00002" bs=1 seek=200000 conv=notrunc 2>/dev/null
expect_error "holds non-finite values" "${PRED[@]}" --init "$W/bad/ckpt"
bad; off=$(LC_ALL=C grep -obUaP '\xc7\x1c\x08' "$W/bad/ckpt.index" | head -1 | cut -d: -f1)
printf '\x0b' | dd of="$W/bad/ckpt.index" bs=1 seek=$((off + 2)) conv=notrunc 2>/dev/null
expect_error "leaf 'Encoder/encoder_norm/bias': expected an IndexInfo (msgpack extension type 8), found extension type 11" \
  "${PRED[@]}" --init "$W/bad/ckpt"
expect_error "leaf 'Encoder/encoderblock_0/SelfAttention/key/bias' is (2, 16), the model config needs (4, 8)" \
  ckpt import "$FX/vmoe-tiny-every2/ckpt" "$W/never.safetensors" --config "$W/ft.yaml" --set model.num_heads=4 \
  --set model.num_layers=12 --set model.representation_size=0 --set model.image_size=32
expect_error "is a directory; give the checkpoint prefix, e.g. '$FX/vmoe-tiny-every2/ckpt'" "${PRED[@]}" --init "$FX/vmoe-tiny-every2"
echo "vmoe_cli: all passed"
