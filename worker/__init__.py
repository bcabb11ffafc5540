"""One worker process: one model, one llama_cpp.Llama, served over a private unix socket."""
