// Runs the npm bittorrent-tracker reference server (WebSocket only) for side-by-side
// benchmarks: node reference-server.mjs [--host 127.0.0.1] [--port 3000]. Stops on SIGTERM.

import { Server } from 'bittorrent-tracker'

const args = process.argv.slice(2)
const arg = (name, fallback) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : fallback }
const host = arg('--host', '127.0.0.1')
const port = Number(arg('--port', '3000'))

const server = new Server({ udp: false, http: false, ws: true, stats: false })
server.on('warning', () => {})
server.on('error', err => { console.error(err); process.exit(1) })
server.listen(port, host, () => console.log(`bittorrent-tracker listening on ws://${host}:${port}`))
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)))
