package local.fhircharge.validator;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.List;
import java.util.stream.Stream;
import org.hl7.fhir.r5.elementmodel.Manager.FhirFormat;
import org.hl7.fhir.r5.model.CodeSystem;
import org.hl7.fhir.r5.model.Enumerations;
import org.hl7.fhir.r5.model.OperationOutcome;
import org.hl7.fhir.r5.model.OperationOutcome.IssueSeverity;
import org.hl7.fhir.r5.model.OperationOutcome.OperationOutcomeIssueComponent;
import org.hl7.fhir.utilities.npm.NpmPackage;
import org.hl7.fhir.utilities.validation.ValidationMessage;
import org.hl7.fhir.validation.ValidationEngine;
import org.hl7.fhir.validation.service.StandAloneValidatorFetcher;

/**
 * Runs the official HL7 FHIR Validator engine on JSON files, offline, for FHIR R4 (4.0.1).
 *
 * <p>The command-line front end of the validator is not published on Maven Central for 6.x, so this is the
 * "validate" path of it, reduced to what the project needs: the R4 core package, HL7 terminology and
 * extensions packages from the local package cache (no terminology server, no network), the project's own
 * conformance package(s), and every resource of the given files (Bundle entries one by one, so each issue
 * names the resource it belongs to). Writes a JSON report and exits 0 when no resource has an error, 1 when
 * one has, 2 when the validator could not run.
 *
 * <pre>
 * java -Duser.home=PACKAGE_HOME -cp ... local.fhircharge.validator.ValidatorMain \
 *      --report report.json [--ig PACKAGE_FOLDER_OR_TGZ]... FILE_OR_FOLDER...
 * </pre>
 */
public final class ValidatorMain {

	private static final String FHIR_VERSION = "4.0.1";
	private static final String CORE = "hl7.fhir.r4.core#" + FHIR_VERSION;
	/** Loaded without chasing their dependencies: npm serves these versions, not the ones the engine prefers. */
	private static final String[][] SUPPORT_PACKAGES = {
		{"hl7.terminology.r4", "7.0.1"},
		{"hl7.fhir.uv.extensions.r4", "5.3.0-ballot-tc1"},
	};

	private ValidatorMain() {}

	public static void main(String[] args) {
		try {
			System.exit(run(args));
		} catch (Exception e) {
			System.err.println("validator: " + e);
			e.printStackTrace(System.err);
			System.exit(2);
		}
	}

	static int run(String[] args) throws Exception {
		Path report = null;
		List<String> igs = new ArrayList<>();
		List<Path> inputs = new ArrayList<>();
		for (int i = 0; i < args.length; i++) {
			switch (args[i]) {
				case "--report" -> report = Paths.get(args[++i]);
				case "--ig" -> igs.add(args[++i]);
				default -> inputs.add(Paths.get(args[i]));
			}
		}
		if (report == null || inputs.isEmpty()) {
			System.err.println("usage: ValidatorMain --report FILE [--ig PACKAGE]... FILE_OR_FOLDER...");
			return 2;
		}
		long t0 = System.nanoTime();
		ValidationEngine engine = engine(igs);
		long loaded = System.nanoTime();

		JsonArray issues = new JsonArray();
		int resources = 0;
		int errors = 0;
		int warnings = 0;
		for (Path file : files(inputs)) {
			for (Resource res : resourcesOf(file)) {
				resources++;
				List<ValidationMessage> messages = new ArrayList<>();
				OperationOutcome outcome = engine.validate(res.json.getBytes(StandardCharsets.UTF_8), FhirFormat.JSON,
						List.of(), messages);
				for (OperationOutcomeIssueComponent issue : outcome.getIssue()) {
					IssueSeverity severity = issue.getSeverity();
					if (severity == IssueSeverity.ERROR || severity == IssueSeverity.FATAL) {
						errors++;
					} else if (severity == IssueSeverity.WARNING) {
						warnings++;
					} else {
						continue; // information: not reported
					}
					JsonObject item = new JsonObject();
					item.addProperty("file", file.toString());
					item.addProperty("resource", res.label);
					item.addProperty("severity", severity.toCode());
					item.addProperty("location", issue.getExpressionOrLocation().isEmpty()
							? "" : issue.getExpressionOrLocation().get(0).asStringValue());
					item.addProperty("message", issue.getDetails().getText());
					issues.add(item);
				}
			}
		}
		JsonObject out = new JsonObject();
		out.addProperty("validator", org.hl7.fhir.utilities.VersionUtil.getVersion());
		out.addProperty("fhirVersion", FHIR_VERSION);
		out.addProperty("resources", resources);
		out.addProperty("errors", errors);
		out.addProperty("warnings", warnings);
		out.addProperty("loadSeconds", (loaded - t0) / 1e9);
		out.addProperty("validateSeconds", (System.nanoTime() - loaded) / 1e9);
		out.add("issues", issues);
		Gson gson = new GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create();
		Files.writeString(report, gson.toJson(out) + "\n", StandardCharsets.UTF_8);
		System.out.printf("validator: %d resources, %d errors, %d warnings (load %.1f s, validate %.1f s)%n",
				resources, errors, warnings, (loaded - t0) / 1e9, (System.nanoTime() - loaded) / 1e9);
		return errors == 0 ? 0 : 1;
	}

	private static ValidationEngine engine(List<String> igs) throws Exception {
		ValidationEngine engine = new ValidationEngine.ValidationEngineBuilder()
				.withVersion(FHIR_VERSION)
				.withCanRunWithoutTerminologyServer(true)
				.withTxServer(null, null, org.hl7.fhir.utilities.FhirPublication.R4, false)
				.withUserAgent("fhir-charge-adapter-tests")
				.fromSource(CORE);
		// no terminology server (none is reachable): codes are checked against the loaded packages only
		engine.getContext().setCanRunWithoutTerminology(true);
		engine.getContext().setNoTerminologyServer(true);
		StandAloneValidatorFetcher fetcher = new StandAloneValidatorFetcher(engine.getPcm(), engine.getContext(), engine);
		engine.setFetcher(fetcher);
		engine.setLocator(fetcher);
		engine.setPolicyAdvisor(fetcher);
		engine.setAnyExtensionsAllowed(false);
		engine.setAllowExampleUrls(false);
		for (String[] pkg : SUPPORT_PACKAGES) {
			NpmPackage npm = engine.getPcm().loadPackage(pkg[0], pkg[1]);
			engine.getContext().loadFromPackage(npm, engine.getIgLoader().makeLoader(FHIR_VERSION));
		}
		engine.getContext().cacheResource(iso4217());
		for (String ig : igs) {
			engine.getIgLoader().loadIg(engine.getIgs(), engine.getBinaries(), ig, true);
		}
		return engine;
	}

	/**
	 * ISO 4217 currencies as a complete CodeSystem, from the engine's own enumeration: Money.currency is bound
	 * (required) to a value set of this code system, which only a terminology server would otherwise supply.
	 */
	private static CodeSystem iso4217() {
		CodeSystem cs = new CodeSystem();
		cs.setUrl("urn:iso:std:iso:4217");
		cs.setName("ISO4217");
		cs.setTitle("ISO 4217 currency codes (from the validator engine's enumeration)");
		cs.setStatus(Enumerations.PublicationStatus.ACTIVE);
		cs.setContent(Enumerations.CodeSystemContentMode.COMPLETE);
		cs.setCaseSensitive(true);
		for (Enumerations.Currencies currency : Enumerations.Currencies.values()) {
			if (currency != Enumerations.Currencies.NULL) {
				cs.addConcept().setCode(currency.toCode()).setDisplay(currency.getDisplay());
			}
		}
		return cs;
	}

	private static List<Path> files(List<Path> inputs) throws IOException {
		List<Path> out = new ArrayList<>();
		for (Path input : inputs) {
			if (Files.isDirectory(input)) {
				try (Stream<Path> walk = Files.walk(input)) {
					walk.filter(p -> p.toString().endsWith(".json")).sorted().forEach(out::add);
				}
			} else {
				out.add(input);
			}
		}
		return out;
	}

	private record Resource(String label, String json) {}

	/** A Bundle's entry resources one by one (each issue then names its resource), else the file itself. */
	private static List<Resource> resourcesOf(Path file) throws IOException {
		String text = Files.readString(file, StandardCharsets.UTF_8);
		JsonObject root = JsonParser.parseString(text).getAsJsonObject();
		List<Resource> out = new ArrayList<>();
		if ("Bundle".equals(str(root, "resourceType")) && root.has("entry")) {
			JsonArray entries = root.getAsJsonArray("entry");
			for (int i = 0; i < entries.size(); i++) {
				JsonObject entry = entries.get(i).getAsJsonObject();
				if (entry.has("resource")) {
					JsonObject res = entry.getAsJsonObject("resource");
					out.add(new Resource("entry[" + i + "] " + label(res), res.toString()));
				}
			}
		} else {
			out.add(new Resource(label(root), text));
		}
		return out;
	}

	private static String label(JsonObject res) {
		String kind = str(res, "resourceType");
		if (res.has("id")) {
			return kind + "/" + str(res, "id");
		}
		if (res.has("identifier") && res.get("identifier").isJsonArray() && res.getAsJsonArray("identifier").size() > 0) {
			return kind + " " + str(res.getAsJsonArray("identifier").get(0).getAsJsonObject(), "value");
		}
		return kind;
	}

	private static String str(JsonObject obj, String key) {
		JsonElement el = obj.get(key);
		return el != null && el.isJsonPrimitive() ? el.getAsString() : "";
	}
}
