#!/bin/sh
# Renders receipt.txt into receipt.png: a shop receipt on off-white paper,
# photographed on a table: slightly rotated, a little curl, uneven light,
# sensor noise and softness. Deterministic (fixed seed), ImageMagick 6 or 7.
#   sh examples/data/make_receipt.sh
set -eu
cd "$(dirname "$0")"
# /usr/local/bin may hold a stand-in called "convert"; prefer the real binary.
IM=${IM:-$(command -v convert-im6.q16 || command -v magick || command -v /usr/bin/convert || echo convert)}
FONT=${FONT:-DejaVu-Sans-Mono}
PAPER='#f3eee2'
INK='#2a2926'
TABLE='#7a6550'
# -annotate expands % escapes, so a literal % is written %%; it also drops
# the text's leading spaces, so the first one becomes a no-break space.
NBSP=$(printf '\302\240')
TEXT=$(sed -e "1s/^ /$NBSP/" -e 's/%/%%/g' receipt.txt)

# 1. the paper: text set in a receipt-printer-like monospace face
#    (-annotate on a canvas, then trimmed: IM6's label: rejects this much text)
"$IM" -size 480x1000 xc:"$PAPER" -fill "$INK" -font "$FONT" -pointsize 13.5 \
  -interline-spacing 2 -annotate +20+30 "$TEXT" -trim +repage \
  -bordercolor "$PAPER" -border 24x30 \
  -wave 1.5x700 \
  -seed 11 -attenuate 0.35 +noise Gaussian \
  /tmp/receipt_paper.$$.png

# 2. the photo: paper on a table, rotated, lit from the top left, noisy, soft
"$IM" -size 600x900 xc:"$TABLE" -seed 23 -attenuate 0.3 +noise Gaussian \
  \( /tmp/receipt_paper.$$.png -background none -rotate -2.3 \) \
  -gravity center -geometry +6-4 -composite \
  \( -size 1100x1500 radial-gradient:'#ffffff'-'#707070' \
     -gravity center -crop 600x900-110-150 +repage -gravity center -extent 600x900 \) \
  -compose multiply -composite -compose over \
  -seed 5 -attenuate 0.25 +noise Gaussian -blur 0x0.7 \
  -strip -colors 16 -define png:compression-level=9 PNG8:receipt.png
rm -f /tmp/receipt_paper.$$.png
