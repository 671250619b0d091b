// Health check: GET / answers 200 with the welcome object (pouchdb-server has no /_up)
const http = require("http");
const port = process.env.COUCHDB_PORT || 5984;
const req = http.get({ host: "127.0.0.1", port, path: "/", timeout: 4000 }, (res) => {
  let body = "";
  res.on("data", (d) => { body += d; });
  res.on("end", () => {
    const ok = res.statusCode === 200 && body.includes("Welcome");
    if (!ok) console.error(`unhealthy: ${res.statusCode} ${body.slice(0, 200)}`);
    process.exit(ok ? 0 : 1);
  });
});
req.on("timeout", () => { console.error("unhealthy: timeout"); req.destroy(); process.exit(1); });
req.on("error", (e) => { console.error(`unhealthy: ${e.message}`); process.exit(1); });
