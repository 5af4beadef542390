#!/usr/bin/env bash
# setup_storage.sh [PATH]: put models, offload cache and Hugging Face cache on a big disk.
#   - creates PATH/models, PATH/offload_cache, PATH/huggingface   (PATH default: ~/gptoss-models)
#   - links ./models, ./offload_cache, ./hf_cache in the project to them
#   - writes MODELS_DIR, CACHE_DIR, HF_CACHE_DIR into the project's .env (other lines are kept),
#     which docker-compose and `make ... DOCKER=1` read
#   - prints the free space against the README's needs: 100 GB (sequential), 500 GB (auto)
# Safe to run again. Exit 2, with one line, when PATH is a file, cannot be created or is not writable,
# or when ./models (etc.) is a real folder that holds files.
set -euo pipefail

NEED_SEQUENTIAL_GB=100
NEED_AUTO_GB=500

die() {
    printf 'setup_storage.sh: error: %s\n' "$*" >&2
    exit 2
}

case ${1:-} in
    -h | --help)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
esac
[ $# -le 1 ] || die "one PATH at most (got $#): setup_storage.sh [PATH]"

project=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
storage=${1:-$HOME/gptoss-models}

if [ -e "$storage" ] && [ ! -d "$storage" ]; then
    die "$storage is a file, not a folder: pick a folder"
fi
mkdir -p "$storage" 2>/dev/null || die "cannot create $storage: pick a folder you can write to"
if [ ! -w "$storage" ] || [ ! -x "$storage" ]; then
    die "$storage is not writable: pick a folder you can write to"
fi
storage=$(cd "$storage" && pwd -P)
[ "$storage" != "$project" ] || die "$storage is the project folder itself: pick a folder outside it"

# link NAME TARGET: ./NAME -> TARGET, replacing an old link or an empty folder, never files.
link() {
    local name=$1 target=$2 path="$project/$1"
    if [ -L "$path" ]; then
        if [ "$(readlink "$path")" = "$target" ]; then
            echo "  ./$name -> $target (already)"
            return
        fi
        echo "  ./$name -> $target (was -> $(readlink "$path"))"
        rm -f "$path"
    elif [ -d "$path" ]; then
        rmdir "$path" 2>/dev/null ||
            die "./$name is a folder with files: move them to $target, remove ./$name, run again"
        echo "  ./$name -> $target (replaced an empty folder)"
    elif [ -e "$path" ]; then
        die "./$name is a file: move it away and run again"
    else
        echo "  ./$name -> $target"
    fi
    ln -s "$target" "$path"
}

mkdir -p "$storage/models" "$storage/offload_cache" "$storage/huggingface"
echo "storage: $storage"
link models "$storage/models"
link offload_cache "$storage/offload_cache"
link hf_cache "$storage/huggingface"

# .env: our three keys replaced, everything else kept.
env_file="$project/.env"
tmp="$env_file.tmp.$$"
if [ -f "$env_file" ]; then
    grep -vE '^(MODELS_DIR|CACHE_DIR|HF_CACHE_DIR)=|^# written by setup_storage.sh' "$env_file" >"$tmp" || true
else
    : >"$tmp"
fi
{
    echo "# written by setup_storage.sh $storage"
    echo "MODELS_DIR=$storage/models"
    echo "CACHE_DIR=$storage/offload_cache"
    echo "HF_CACHE_DIR=$storage/huggingface"
} >>"$tmp"
mv "$tmp" "$env_file"
echo "  $env_file: MODELS_DIR, CACHE_DIR, HF_CACHE_DIR (docker-compose and make DOCKER=1 read it)"
echo "  local runs: export HF_HOME=$storage/huggingface"

free_kb=$(df -Pk "$storage" | awk 'NR == 2 {print $4}')
free_gb=$((free_kb / 1000 / 1000))
if [ "$free_gb" -ge "$NEED_AUTO_GB" ]; then
    verdict="enough for --device-map sequential (${NEED_SEQUENTIAL_GB} GB) and auto (${NEED_AUTO_GB} GB)"
elif [ "$free_gb" -ge "$NEED_SEQUENTIAL_GB" ]; then
    verdict="enough for --device-map sequential (${NEED_SEQUENTIAL_GB} GB), not for auto (${NEED_AUTO_GB} GB)"
else
    verdict="LESS than the ${NEED_SEQUENTIAL_GB} GB that --device-map sequential needs (auto: ${NEED_AUTO_GB} GB)"
fi
echo "free: $free_gb GB at $storage: $verdict"
