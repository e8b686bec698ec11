"""One request, start to finish: the archive, the parsed job, the handler
that runs it, the translator process, the fixed runtime and the signatures."""
