"""Authentication: JWT verification (HS256 secret or JWKS) and the current user."""
