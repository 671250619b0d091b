#!/bin/bash
# pouchdb-server on 0.0.0.0:5984 with its data and config.json in /opt/couchdb/data.
# COUCHDB_USER + COUCHDB_PASSWORD: that user becomes the (only) server admin; pouchdb-server
# stores the password hashed (pbkdf2) in config.json. Without them: "admin party", as CouchDB.
# Note: node as PID 1 ignores SIGTERM; run with `init: true` (compose) / `docker run --init`.
set -euo pipefail
DATA_DIR="${COUCHDB_DATA_DIR:-/opt/couchdb/data}"
CONFIG="$DATA_DIR/config.json"
mkdir -p "$DATA_DIR" /tmp/pouchdb
node - "$CONFIG" "${POUCHDB_LOG_LEVEL:-warning}" <<'JS'
const fs = require("fs");
const [file, level] = process.argv.slice(2);
let c = {};
try { c = JSON.parse(fs.readFileSync(file, "utf8")); } catch (e) {}
c.log = Object.assign(c.log || {}, { file: "/tmp/pouchdb/log.txt", level: level });
const user = process.env.COUCHDB_USER, password = process.env.COUCHDB_PASSWORD;
if (user && password) {
  c.admins = { [user]: password };  // hashed by pouchdb-server at start
} else if (user || password) {
  console.error("couchdb-entrypoint: set both COUCHDB_USER and COUCHDB_PASSWORD, or neither");
  process.exit(2);
} else {
  delete c.admins;
}
fs.writeFileSync(file, JSON.stringify(c, null, 2) + "\n", { mode: 0o600 });
JS
unset COUCHDB_PASSWORD
exec node /opt/pouchdb-server/node_modules/pouchdb-server/bin/pouchdb-server \
    --host 0.0.0.0 --port "${COUCHDB_PORT:-5984}" --dir "$DATA_DIR/" --config "$CONFIG" "$@"
