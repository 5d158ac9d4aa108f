"""The prompt pipeline: preprocess -> queue -> await -> collect -> deliver."""
