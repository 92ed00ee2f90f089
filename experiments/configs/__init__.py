"""Study configurations, installed with gankit as gankit.study_configs (setup.cfg)."""
