"""Pure helpers every layer may use, with no knowledge of exchanges or protocols: a bounded
memo and how durations and dates are written. Imports nothing of `proxy`."""
