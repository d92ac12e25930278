"""OpenAI API shapes: request validation, reasoning split, response builders."""
