// The dev server the test starts on 127.0.0.1 (port from the command line); the HMR
// WebSocket is reached through the proxy, on the page's own host and port.
export default { server: { host: "127.0.0.1", strictPort: true } };
