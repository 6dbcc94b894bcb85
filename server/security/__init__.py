"""Who may call the server and as which tenant: API keys and client certificates mapped to
tenants (the keys file), TLS and mTLS, and reloading both without a restart."""
