"""The egress gateway: every VM's outbound traffic, as HTTP CONNECT tunnels, through one host process that
knows whose each connection is (the VM it came from, so its user and purpose), checks it against the
allow-list and the user's limits, resolves the name on the host, and leaves through that user's own egress
identity (the host's route, a dedicated source address, or their upstream proxy). It only tunnels: TLS
stays end to end between the CLI and the provider, so the gateway never sees a token."""
