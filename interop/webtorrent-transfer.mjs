// One side of a real WebTorrent transfer through a given tracker, for the interop tests.
//
//   node webtorrent-transfer.mjs seed  --tracker URL --file PATH
//       seeds PATH, prints "MAGNET <uri>", and keeps seeding until stdin closes
//   node webtorrent-transfer.mjs fetch --tracker URL --magnet URI --out DIR
//       downloads by magnet into DIR, prints "DONE <path>" and exits 0
//
// Only the given tracker is used: DHT, LSD, uTP, PEX, UPnP and NAT-PMP are off, and WebRTC
// binds loopback only. Every run ends by itself: a 60 s deadline exits non-zero.

import { join } from 'node:path'
import WebTorrent from 'webtorrent'
import WebSocketTracker from 'bittorrent-tracker/websocket-tracker'

const [role, ...rest] = process.argv.slice(2)
const arg = name => { const i = rest.indexOf(name); return i >= 0 ? rest[i + 1] : undefined }
const tracker = arg('--tracker')
if (!tracker || !['seed', 'fetch'].includes(role)) {
  console.error('usage: webtorrent-transfer.mjs seed|fetch --tracker URL ...')
  process.exit(2)
}

setTimeout(() => { console.error(`${role}: deadline passed`); process.exit(1) }, 60_000).unref()

// simple-peer waits 5 s for an ICE-gathering event node-datachannel never fires.
const createPeer = WebSocketTracker.prototype._createPeer
WebSocketTracker.prototype._createPeer = function (opts) {
  return createPeer.call(this, { ...opts, iceCompleteTimeout: 1500 })
}

const client = new WebTorrent({
  dht: false,
  lsd: false,
  utPex: false,
  utp: false,
  natUpnp: false,
  natPmp: false,
  webSeeds: false,
  tracker: { rtcConfig: { iceServers: [], bindAddress: '127.0.0.1' } }
})
client.on('error', err => { console.error(`${role}: ${err.message}`); process.exit(1) })

if (role === 'seed') {
  const file = arg('--file')
  client.seed(file, { announce: [tracker], announceList: [[tracker]], name: 'payload.bin' }, torrent => {
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
      client.destroy(() => process.exit(0))
    })
  })
}
