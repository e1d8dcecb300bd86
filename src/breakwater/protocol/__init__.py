"""Wire types: the OpenAI request/response models and Breakwater's internal token events."""
