"""The recipe at the centre: schema (pydantic), loading (YAML, --set overrides) and the catalog of names."""
