// One side of a real WebTorrent transfer through a given tracker, for the interop tests.
//
//   node webtorrent-transfer.mjs seed  --tracker URL --file PATH
//       seeds PATH, prints "MAGNET <uri>", and keeps seeding until stdin closes
//   node webtorrent-transfer.mjs fetch --tracker URL --magnet URI --out DIR [--stay]
//       downloads by magnet into DIR, prints "DONE <path>" and exits 0 (with --stay, keeps
//       seeding to the others until stdin closes, as pool nodes do)
//
// Only the given tracker is used: DHT, LSD, uTP, PEX, UPnP and NAT-PMP are off, and WebRTC
// binds loopback only (--bind any: every local address, for browser peers). Every run ends
// by itself: a deadline (--deadline SECS, default 60) exits non-zero.

import { join } from 'node:path'
import WebTorrent from 'webtorrent'
import WebSocketTracker from 'bittorrent-tracker/websocket-tracker'
import { installIceSettle } from './ice-settle.mjs'

const [role, ...rest] = process.argv.slice(2)
const arg = name => { const i = rest.indexOf(name); return i >= 0 ? rest[i + 1] : undefined }
const tracker = arg('--tracker')
if (!tracker || !['seed', 'fetch'].includes(role)) {
  console.error('usage: webtorrent-transfer.mjs seed|fetch --tracker URL ...')
  process.exit(2)
}

const deadline = Number(arg('--deadline') ?? 60) * 1000
setTimeout(() => { console.error(`${role}: deadline passed`); process.exit(1) }, deadline).unref()

// Offers and answers go out once their host candidates are gathered (see ice-settle.mjs).
installIceSettle(WebSocketTracker)

const client = new WebTorrent({
  dht: false,
  lsd: false,
  utPex: false,
  utp: false,
  natUpnp: false,
  natPmp: false,
  webSeeds: false,
  // --bind any: every local address (a browser peer has only this machine's own address,
  // never loopback); default loopback only.
  tracker: { rtcConfig: arg('--bind') === 'any' ? { iceServers: [] } : { iceServers: [], bindAddress: arg('--bind') ?? '127.0.0.1' } }
})
client.on('error', err => { console.error(`${role}: ${err.message}`); process.exit(1) })

if (role === 'seed') {
  const file = arg('--file')
  // No name override: webtorrent serves a seeded path from dirname + name, so a renamed
  // file would be unreadable and every request rejected.
  client.seed(file, { announce: [tracker], announceList: [[tracker]] }, torrent => {
    console.log(`MAGNET ${torrent.magnetURI}`)
  })
  process.stdin.resume()
  process.stdin.on('end', () => client.destroy(() => process.exit(0)))
} else {
  const out = arg('--out')
  client.add(arg('--magnet'), { announce: [tracker], path: out }, torrent => {
    torrent.on('done', () => {
      const path = join(out, torrent.files[0].path)
      console.log(`DONE ${path} ${torrent.length} bytes from ${torrent.numPeers} peer(s)`)
      if (rest.includes('--stay')) {
        process.stdin.resume()
        process.stdin.on('end', () => client.destroy(() => process.exit(0)))
      } else {
        client.destroy(() => process.exit(0))
      }
    })
  })
}
