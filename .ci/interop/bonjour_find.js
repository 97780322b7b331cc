// bonjour-service side of .ci/interop/run.sh: find({type: 'gambiarra'}) for SECONDS,
// one JSON line per `up`/`down`. Run with NODE_PATH pointing at a node_modules with bonjour-service.
const { Bonjour } = require('bonjour-service')
const seconds = Number(process.argv[2] || 30)
const out = (o) => console.log(JSON.stringify(o))
const bonjour = new Bonjour()
const browser = bonjour.find({ type: 'gambiarra' })
browser.on('up', (s) => out({ event: 'up', name: s.name, host: s.host, port: s.port,
  addresses: s.addresses, txt: s.txt, referer: s.referer && s.referer.address }))
browser.on('down', (s) => out({ event: 'down', name: s.name }))
const stop = () => { browser.stop(); bonjour.destroy(); process.exit(0) }
setTimeout(stop, seconds * 1000)
process.on('SIGTERM', stop)
