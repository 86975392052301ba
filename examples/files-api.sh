#!/bin/sh
# Files over HTTP with nothing but curl, as a client that does not mount sees a vfolder: get a
# token, upload a file with tus (create the upload, then send its bytes), list, read a range,
# rename, delete.
#
#   examples/files-api.sh HOST VFOLDER-UUID FILE
#
# FILE lands at uploads/<its name> in the vfolder (keep the name URL-safe: letters, digits,
# '.', '-', '_'), then is renamed and the uploads/ directory deleted again. Needs root (for the
# CLI's control socket) and a running `vfusefs serve` with daemon.files_listen and
# daemon.files_secret_file set (`make run`'s demo has both). Set VFUSEFS_CONFIG (or pass nothing
# and use /etc/vfusefs/vfusefs.toml) so `vfusefs` finds the daemon; VFUSEFS may name the binary.
set -eu
[ $# -eq 3 ] || { echo "usage: $0 HOST VFOLDER-UUID FILE" >&2; exit 2; }
host=$1 vfid=$2 file=$3
vfusefs=${VFUSEFS:-vfusefs}

listen=$("$vfusefs" status --json | sed -n 's/.*"files_listen": "\(.*\)".*/\1/p')
[ -n "$listen" ] || { echo "$0: the daemon serves no file API (set daemon.files_listen)" >&2; exit 1; }
base=http://$(echo "$listen" | sed 's/^0\.0\.0\.0:/127.0.0.1:/')
files=$base/v1/files/$host/$vfid
name=$(basename "$file")
size=$(wc -c < "$file")

# a token for this vfolder, rwd, for ten minutes (a Backend.AI manager signs its own with the key)
token=$("$vfusefs" vfolder token "$host" "$vfid" --mode rwd --ttl 10m)
auth="Authorization: Bearer $token"
b64() { printf %s "$1" | base64 | tr -d '\n'; }

echo "== upload $file ($size bytes) with tus"
location=$(curl -sS -f -X POST "$base/v1/uploads" -H "$auth" -H "Tus-Resumable: 1.0.0" \
    -H "Upload-Length: $size" \
    -H "Upload-Metadata: host $(b64 "$host"),vfolder $(b64 "$vfid"),path $(b64 "uploads/$name")" \
    -D - -o /dev/null | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
curl -sS -f -X PATCH "$base$location" -H "$auth" -H "Tus-Resumable: 1.0.0" \
    -H "Upload-Offset: 0" -H "Content-Type: application/offset+octet-stream" \
    --data-binary "@$file" -D - -o /dev/null | tr -d '\r' | grep -i '^upload-offset'

echo "== list uploads/"
curl -sS -f -H "$auth" "$files/uploads/"
echo
echo "== its first 16 bytes (a range)"
curl -sS -f -H "$auth" -r 0-15 "$files/uploads/$name" | od -An -c | head -2
echo "== rename, then delete the directory"
curl -sS -f -X POST -H "$auth" "$files/uploads/$name?op=rename" -d "{\"to\": \"uploads/$name.old\"}"
echo
curl -sS -f -X POST -H "$auth" "$files/uploads?op=delete&recursive=1"
echo
