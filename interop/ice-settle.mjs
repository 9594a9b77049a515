// Sends an offer or answer once its ICE candidates are gathered, instead of after a fixed
// delay. simple-peer (non-trickle, as the WebTorrent tracker client uses it) waits for a null
// candidate that node-datachannel never fires, then falls back to a timer that starts at the
// first candidate. node-datachannel also reports gathering "complete" before its first
// candidate, so that state is no signal either. What matters is that host candidates were
// gathered and stopped arriving: the description is sent SETTLE_MS after the last one, on a
// busy machine as late as it takes; FALLBACK_MS after the first candidate at the latest.

const SETTLE_MS = 150
const FALLBACK_MS = 5000

export function installIceSettle (WebSocketTracker) {
  const createPeer = WebSocketTracker.prototype._createPeer
  WebSocketTracker.prototype._createPeer = function (opts) {
    const peer = createPeer.call(this, { ...opts, iceCompleteTimeout: FALLBACK_MS })
    const pc = peer._pc
    let settle = null
    pc.addEventListener('icecandidate', event => {
      if (!event.candidate || peer._iceComplete || peer.destroyed) return
      clearTimeout(settle)
      settle = setTimeout(() => {
        if (peer._iceComplete || peer.destroyed) return
        peer._iceComplete = true
        peer.emit('_iceComplete')
      }, SETTLE_MS)
      settle.unref?.()
    })
    return peer
  }
}
