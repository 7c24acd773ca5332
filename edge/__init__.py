"""Edge deployment: signed bundles, device agent, transports (planned)."""
