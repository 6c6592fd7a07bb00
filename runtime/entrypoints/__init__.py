"""The ways into the engine: `loom.Engine` / `LocalEngine`, the HTTP server (SGLang's native API and
the OpenAI API), the ZeroMQ front door, and `launch` (a `loom serve` child for `loom.Runtime`)."""
