"""The shipped study files, installed as the package data ``ats.studies`` (``ats.study.study_path``)."""
