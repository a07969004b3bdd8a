"""HTTP: the server (TLS and basic auth from an exporter-toolkit web config) and the client
of the daemon's own API."""
