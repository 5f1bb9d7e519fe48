"""Task definitions: multiple_choice.yaml (declarative) and the doc processors it names."""
