"""Edge deployment: signed LiteRT packages and a device agent that proves parity where it runs.

    edge.keys      Ed25519 key pairs (init_keys, load_private, load_public)
    edge.package   build_package(bundle, out.tar.gz, private_key, version=N): the LiteRT artifacts of a
                   model bundle, their reference parity data and a signed manifest; verify_package(...):
                   safe unpacking (regular files and folders only, no escapes, size limits), the signature,
                   every file's sha256, nothing unlisted; each failure a PackageError naming the member
    edge.agent     python -m edge.agent --root DIR --public-key PEM --token T: an aiohttp service that
                   verifies a pushed package, runs every variant on the device against the reference
                   outputs, activates it atomically only if all pass, serves /predict, rolls back, and
                   comes back after a crash with a working version
    edge.client    EdgeClient(url, token): push, status, predict, rollback

    python -m edge init-keys DIR | package BUNDLE OUT --key PEM --version N | push URL PKG | status URL |
                   rollback URL | agent ...

Nothing here imports the pipeline or MLflow; the agent's process imports no framework (numpy,
ai_edge_litert, cryptography, aiohttp, parity and exporters.base/litert/verify only).
Not here (yet): transports other than HTTP (SSH), network isolation, the pipeline's deploy stage.
"""
