"""Engine integrations (top layer): vLLM first."""
