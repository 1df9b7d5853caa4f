"""Test helpers shipped with the package: a local OpenAI-compatible mock server for tests and benchmarks."""

from datatailor.testing.mock_openai import MockConfig, MockOpenAIServer, MockServerProcess

__all__ = ["MockConfig", "MockOpenAIServer", "MockServerProcess"]
