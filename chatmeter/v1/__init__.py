"""The OpenAI-compatible endpoint (SPEC section 12): `/v1/chat/completions` and
`/v1/models`, a thin adapter over the one exchange of `chatmeter.streaming`."""
