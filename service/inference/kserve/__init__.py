"""KServe v2 (Open Inference Protocol) backend: :mod:`.wire` is the codec, :mod:`.client` the backend."""
