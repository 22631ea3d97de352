"""A site's data, whatever the task: discovery of the dataset layout
(:mod:`.layouts` for volumes, :mod:`.class_layouts` for slices), the CSV
manifest (:mod:`.manifest`), the patient-level split (:mod:`.split`), the
one-patient-one-unit rules (:mod:`.patients`), per-case validation
(:mod:`.case_check`) and the data part of the readiness report
(:mod:`.check_report`). Nothing here leaves the site.
"""
