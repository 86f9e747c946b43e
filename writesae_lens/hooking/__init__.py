"""Family-independent hooked-model machinery: the write interface, the root module, caches, components."""
