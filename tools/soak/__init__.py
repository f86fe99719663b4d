"""The randomized reliability trial (issue 7): `make soak`, and a small one in `make test`."""
