#!/usr/bin/env bash
# Optional system packages. Each feature that needs one says clearly when it is off.
#   fonts-noto-color-emoji: the emoji demo source (without it, that source is skipped with a warning)
set -u
font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
if [ -f "$font" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1; }) \
    && echo "installed fonts-noto-color-emoji" && exit 0
fi
echo "NOTE: fonts-noto-color-emoji is not installed and could not be installed here;"
echo "      the emoji demo source is off (run: sudo apt-get install fonts-noto-color-emoji)."
exit 0
